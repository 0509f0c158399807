#!/usr/bin/env bash
# Entrypoint of the runner image: registers a GitHub Actions self-hosted runner and runs it.
# It is started in the runner's folder (the image's WORKDIR), next to config.sh and run.sh.
#
# RUNNER_MODE chooses one of three modes:
#   registration (default)  The seed guide's runner pods. Asks the GitHub REST API for a
#       registration token with a PAT, configures the runner under the pod's hostname (unique
#       per pod; an offline registration under that name, left by the pod's earlier container,
#       is replaced, an online one never), runs it, and on INT / TERM stops it, removes it from
#       GitHub with a fresh remove token and exits 130 / 143.
#   broker  The stack's single-use base runner. Shows the runner broker the pod's projected
#       ServiceAccount token (GPU_RUNNERS_BROKER_TOKEN_FILE) and gets the pod's one JIT config
#       (POST <GPU_RUNNERS_BROKER_URL>/v1/base-runner/config), then runs it as jit mode does. No
#       GitHub credential: the broker registers the runner under the pod's name, removes the
#       registration when the pod goes, and replaces the pod after its one job. The broker is
#       asked again on 5xx and network errors (the token file is read afresh each time: the
#       kubelet rotates it); 401, 403 and 409 end the script with one line that says why.
#   jit  A per-run GPU runner. Runs the single-use JIT config that gpu_runners minted, handed
#       to the runner in ACTIONS_RUNNER_INPUT_JITCONFIG, never on a command line; there is no
#       token in its environment and it makes no API call.
#
# Environment (the names are defined in gpu_runners/contract.py):
#   GITHUB_REPOSITORY      owner/name the runner serves; the image defaults it to the repository
#                          it was built for
#   GITHUB_ORG             an organisation to register with instead (wins over GITHUB_REPOSITORY)
#   GITHUB_PAT_FILE        file holding the PAT; else /var/run/secrets/github-runner/token when it
#                          exists; else GITHUB_RUNNER_PAT (the seed guide's variable)
#   GITHUB_RUNNER_LABEL    comma-separated labels of the runner (the seed guide's name)
#   RUNNER_EPHEMERAL       true: take one job, then leave GitHub (default false)
#   RUNNER_JITCONFIG_FILE  jit mode: file holding the encoded JIT config
#   GPU_RUNNERS_BROKER_URL         broker mode: the broker's URL, e.g. http://<svc>.<ns>.svc:8080
#   GPU_RUNNERS_BROKER_TOKEN_FILE  broker mode: the projected token (default
#                          /var/run/secrets/gpu-runners-broker/token)
#   GITHUB_API_URL         default https://api.github.com
#   GITHUB_SERVER_URL      default https://github.com
#   RUNNER_API_RETRY_BASE_SECONDS  first pause between two tries of an API request, doubled per
#                          try, with jitter (default 2; tests make it small)
#   RUNNER_API_MAX_WAIT_SECONDS    the most time one request spends pausing between tries,
#                          Retry-After waits included (default 120)
#
# API requests are retried on 5xx, 429, rate-limit 403s and network errors, honouring
# Retry-After and X-RateLimit-Reset; 401, 403 and 404 end the script with one line that says
# what is wrong.
#
# Exit codes: the runner's own status when it stops by itself; 130 after INT, 143 after TERM;
# config.sh's status when it fails; 2 a variable or file is missing or invalid; 3 GitHub or the
# broker refused (401, 403, 404, 409, another 4xx) or a live runner already has this pod's name;
# 4 GitHub or the broker could not be reached, or kept failing, within the retry budget.
#
# The PAT is never printed and never on a command line (curl reads the Authorization header from
# stdin); it is removed from the environment the runner and its jobs inherit. The one-hour
# registration and remove tokens only go to config.sh.
#
# Needs bash 5.1+ (wait -n on given pids), curl 7.84+ (--write-out %header{}), jq and awk.
set -euo pipefail

readonly DEFAULT_PAT_FILE=/var/run/secrets/github-runner/token
readonly DEFAULT_BROKER_TOKEN_FILE=/var/run/secrets/gpu-runners-broker/token
readonly BROKER_CONFIG_PATH=/v1/base-runner/config
readonly DEFAULT_API_URL=https://api.github.com
readonly DEFAULT_SERVER_URL=https://github.com
readonly API_VERSION=2022-11-28
readonly MAX_ATTEMPTS=8
readonly MAX_BACKOFF_SECONDS=30
readonly REQUEST_TIMEOUT_SECONDS=20
# After INT / TERM the runner gets STOP_TIMEOUT_SECONDS to cancel its job and stop, and removing
# it from GitHub gets CLEANUP_MAX_WAIT_SECONDS of retries with shorter requests: together they
# stay inside the base runner's termination grace period (120 s) before the kubelet kills us.
readonly STOP_TIMEOUT_SECONDS=30
readonly CLEANUP_MAX_WAIT_SECONDS=15
readonly CLEANUP_REQUEST_TIMEOUT_SECONDS=10
# curl exit codes worth another try: resolve/connect failures, timeouts, dropped connections.
readonly RETRYABLE_CURL_CODES=" 5 6 7 16 18 28 35 52 55 56 92 "

log() {
  printf 'entrypoint: %s\n' "$*" >&2
}

die() {
  local code=$1
  shift
  printf 'entrypoint: error: %s\n' "$*" >&2
  exit "$code"
}

is_number() {
  [[ $1 =~ ^[0-9]+([.][0-9]+)?$ ]]
}

# Sleeps in the background and waits for it, so that INT / TERM interrupt the pause at once
# (bash runs a trap only after the foreground command ends).
pause() {
  sleep "$1" &
  wait "$!"
}

# --- Configuration ------------------------------------------------------------------------------

read_settings() {
  api_url=${GITHUB_API_URL:-$DEFAULT_API_URL}
  api_url=${api_url%/}
  server_url=${GITHUB_SERVER_URL:-$DEFAULT_SERVER_URL}
  server_url=${server_url%/}
  [[ $api_url =~ ^https?://[^[:space:]]+$ ]] ||
    die 2 "GITHUB_API_URL is '$api_url'; it must be an http(s) URL such as $DEFAULT_API_URL"
  [[ $server_url =~ ^https?://[^[:space:]]+$ ]] ||
    die 2 "GITHUB_SERVER_URL is '$server_url'; it must be an http(s) URL such as $DEFAULT_SERVER_URL"

  read_retry_settings

  local organization=${GITHUB_ORG:-} repository=${GITHUB_REPOSITORY:-}
  if [[ -n $organization ]]; then
    [[ $organization =~ ^[A-Za-z0-9][A-Za-z0-9-]*$ ]] ||
      die 2 "GITHUB_ORG is '$organization'; it must be an organisation login (letters, digits, -)"
    scope_path="/orgs/$organization"
    scope_url="$server_url/$organization"
    scope_name="organisation $organization"
    scope_setting=GITHUB_ORG
    permission_hint="a classic PAT needs the admin:org scope (and repo for private repositories), a fine-grained token the organisation permission 'Self-hosted runners: read and write'"
    if [[ -n $repository ]]; then
      log "GITHUB_ORG is set: registering with organisation $organization, not $repository"
    fi
  elif [[ -n $repository ]]; then
    [[ $repository =~ ^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$ ]] ||
      die 2 "GITHUB_REPOSITORY is '$repository'; it must be owner/name"
    scope_path="/repos/$repository"
    scope_url="$server_url/$repository"
    scope_name="repository $repository"
    scope_setting=GITHUB_REPOSITORY
    permission_hint="a classic PAT needs the repo scope, a fine-grained token the repository permission 'Administration: read and write'"
  else
    die 2 "no runner scope: set GITHUB_REPOSITORY to owner/name (or GITHUB_ORG to an organisation)"
  fi

  runner_name=${HOSTNAME:-}
  [[ $runner_name =~ ^[A-Za-z0-9._-]+$ ]] ||
    die 2 "the hostname '$runner_name' cannot name a runner (letters, digits, '.', '_', '-')"

  labels=${GITHUB_RUNNER_LABEL:-}
  labels=${labels//[[:space:]]/}

  case ${RUNNER_EPHEMERAL:-false} in
    true | True | TRUE | 1 | yes) ephemeral=true ;;
    false | False | FALSE | 0 | no | '') ephemeral=false ;;
    *) die 2 "RUNNER_EPHEMERAL is '${RUNNER_EPHEMERAL}'; allowed: true, false (or 1, 0)" ;;
  esac
}

read_retry_settings() {
  retry_base=${RUNNER_API_RETRY_BASE_SECONDS:-2}
  max_wait=${RUNNER_API_MAX_WAIT_SECONDS:-120}
  is_number "$retry_base" ||
    die 2 "RUNNER_API_RETRY_BASE_SECONDS is '$retry_base'; it must be a number of seconds"
  is_number "$max_wait" ||
    die 2 "RUNNER_API_MAX_WAIT_SECONDS is '$max_wait'; it must be a number of seconds"
}

# Sets `pat` and `pat_source`, and takes GITHUB_RUNNER_PAT out of the environment: the runner's
# jobs inherit it, and the base runner's jobs read the PAT from its file when they need it.
load_pat() {
  local file=${GITHUB_PAT_FILE:-}
  if [[ -n $file ]]; then
    [[ -f $file && -r $file ]] || die 2 "GITHUB_PAT_FILE names $file, which cannot be read"
    pat=$(<"$file")
    pat_source="the file $file (GITHUB_PAT_FILE)"
  elif [[ -f $DEFAULT_PAT_FILE && -r $DEFAULT_PAT_FILE ]]; then
    pat=$(<"$DEFAULT_PAT_FILE")
    pat_source="the file $DEFAULT_PAT_FILE"
  elif [[ -n ${GITHUB_RUNNER_PAT:-} ]]; then
    pat=$GITHUB_RUNNER_PAT
    pat_source="GITHUB_RUNNER_PAT"
  else
    die 2 "no GitHub PAT: set GITHUB_PAT_FILE to a file holding one, mount one at $DEFAULT_PAT_FILE, or set GITHUB_RUNNER_PAT"
  fi
  # A token never contains whitespace; a stray newline would end the Authorization header line.
  pat=${pat//[[:space:]]/}
  [[ -n $pat ]] || die 2 "the PAT in $pat_source is empty"
  unset GITHUB_RUNNER_PAT
}

# --- GitHub REST API ----------------------------------------------------------------------------

# Prints the seconds to wait that a Retry-After value asks for (delta-seconds or an HTTP date).
retry_after_seconds() {
  local value=$1 when
  if [[ $value =~ ^[0-9]+$ ]]; then
    printf '%s' "$value"
  elif when=$(date --date="$value" +%s 2>/dev/null); then
    printf '%s' "$((when > EPOCHSECONDS ? when - EPOCHSECONDS : 0))"
  else
    return 1
  fi
}

# Prints the exponential backoff before try number $1 + 1, with jitter so that pods that failed
# together do not retry together.
backoff_seconds() {
  awk -v base="$retry_base" -v try="$1" -v cap="$MAX_BACKOFF_SECONDS" \
    -v jitter="$((50 + RANDOM % 51))" \
    'BEGIN { d = base * 2 ^ (try - 1); if (d > cap) d = cap; printf "%.3f", d * jitter / 100 }'
}

fits_budget() { # waited, delay, budget
  awk -v waited="$1" -v delay="$2" -v budget="$3" 'BEGIN { exit !(waited + delay <= budget) }'
}

# Prints the `message` of a GitHub (or broker) error body on one line (GitHub's 422 messages span
# several).
github_message() {
  printf '%s' "$1" | jq -r '.message? // empty | gsub("\\s+"; " ")' 2>/dev/null || true
}

# api_request METHOD PATH BUDGET TIMEOUT
# Sends one API request, retried within BUDGET seconds of pauses. On a 2xx answer it sets
# `reply_body` and returns 0; otherwise it sets `failure_code` (3 refused, 4 unreachable) and
# `failure_message` (one line, no secret) and returns 1.
api_request() {
  local method=$1 path=$2 budget=$3 timeout=$4
  local url="$api_url$path" try=0 waited=0 delay output meta body status curl_status
  local retry_after remaining reset problem message
  while :; do
    try=$((try + 1))
    curl_status=0
    output=$(printf 'Authorization: Bearer %s\n' "$pat" |
      curl --silent --request "$method" --header @- \
        --header 'Accept: application/vnd.github+json' \
        --header "X-GitHub-Api-Version: $API_VERSION" \
        --user-agent gpu-runners-entrypoint \
        --connect-timeout 10 --max-time "$timeout" \
        --write-out '\n%{http_code} %header{retry-after}|%header{x-ratelimit-remaining}|%header{x-ratelimit-reset}' \
        "$url") || curl_status=$?
    meta=${output##*$'\n'}
    body=${output%$'\n'*}
    status=${meta%% *}
    IFS='|' read -r retry_after remaining reset <<<"${meta#* }"

    delay=""
    if ((curl_status != 0)); then
      if [[ $RETRYABLE_CURL_CODES != *" $curl_status "* ]]; then
        failure_code=4
        failure_message="cannot send $method $url (curl exit status $curl_status)"
        return 1
      fi
      problem="no answer (curl exit status $curl_status)"
    else
      message=$(github_message "$body")
      case $status in
        2??)
          reply_body=$body
          return 0
          ;;
        401)
          failure_code=3
          failure_message="GitHub rejected the PAT from $pat_source (401${message:+ $message}): it is wrong, expired or revoked"
          return 1
          ;;
        403 | 429)
          if [[ -n $retry_after || $remaining == 0 || $status == 429 ]]; then
            problem="rate limited ($status)"
            if [[ -z $retry_after && $remaining == 0 && $reset =~ ^[0-9]+$ ]]; then
              delay=$((reset > EPOCHSECONDS ? reset - EPOCHSECONDS + 1 : 1))
            fi
          else
            failure_code=3
            failure_message="the PAT from $pat_source may not manage the runners of $scope_name (403${message:+ $message}): $permission_hint"
            return 1
          fi
          ;;
        404)
          failure_code=3
          failure_message="GitHub knows no $scope_name, or the PAT's owner is not an admin of it (404 on $method $path): check $scope_setting"
          return 1
          ;;
        5??)
          problem="GitHub answered $status"
          ;;
        *)
          failure_code=3
          failure_message="GitHub answered $status to $method $path${message:+: $message}"
          return 1
          ;;
      esac
    fi

    # GitHub, and proxies in front of it, may say when to come back, on a 503 as on a 429.
    if [[ -z $delay && -n $retry_after ]]; then
      delay=$(retry_after_seconds "$retry_after") || delay=""
    fi
    if ((try >= MAX_ATTEMPTS)); then
      failure_code=4
      failure_message="gave up on $method $path after $try tries: $problem"
      return 1
    fi
    [[ -n $delay ]] || delay=$(backoff_seconds "$try")
    if ! fits_budget "$waited" "$delay" "$budget"; then
      failure_code=4
      failure_message="gave up on $method $path: $problem, and waiting ${delay}s more would exceed the retry budget of ${budget}s (RUNNER_API_MAX_WAIT_SECONDS)"
      return 1
    fi
    log "$method $path: $problem; trying again in ${delay}s (try $((try + 1)) of $MAX_ATTEMPTS)"
    pause "$delay"
    waited=$(awk -v a="$waited" -v b="$delay" 'BEGIN { print a + b }')
  done
}

# Sets `token` to a registration-token or remove-token of the runner scope.
request_token() { # kind budget timeout
  api_request POST "$scope_path/actions/runners/$1" "$2" "$3" || return 1
  token=$(printf '%s' "$reply_body" | jq -r '.token // empty' 2>/dev/null) || token=""
  if [[ -z $token ]]; then
    failure_code=4
    failure_message="GitHub's answer to POST $scope_path/actions/runners/$1 holds no token"
    return 1
  fi
}

# Sets `registered_status` to the status ("online" / "offline") of the runner registered under
# our name, or to "" when there is none.
find_registration() {
  api_request GET "$scope_path/actions/runners?name=$runner_name&per_page=100" \
    "$max_wait" "$REQUEST_TIMEOUT_SECONDS" || return 1
  registered_status=$(printf '%s' "$reply_body" | jq -r --arg name "$runner_name" \
    'first(.runners[]? | select(.name == $name) | .status) // empty' 2>/dev/null) ||
    registered_status=""
}

# --- Registration mode --------------------------------------------------------------------------

stop_runner() {
  [[ -n ${runner_pid:-} ]] || return 0
  # run.sh (RUNNER_MANUALLY_TRAP_SIG=1 in the image) passes the signal on to the listener,
  # which cancels a running job and exits.
  kill -TERM "$runner_pid" 2>/dev/null || true
  sleep "$STOP_TIMEOUT_SECONDS" &
  local timer=$!
  wait -n "$runner_pid" "$timer" 2>/dev/null || true
  if kill -0 "$runner_pid" 2>/dev/null; then
    log "the runner did not stop within ${STOP_TIMEOUT_SECONDS}s; killing it"
    kill -KILL -- "-$runner_pid" 2>/dev/null || kill -KILL "$runner_pid" 2>/dev/null || true
    wait "$runner_pid" 2>/dev/null || true
  fi
  # KILL: the timer inherited the ignored INT and TERM of the signal handler.
  kill -KILL "$timer" 2>/dev/null || true
  wait "$timer" 2>/dev/null || true
  runner_pid=""
}

remove_registration() {
  if ! request_token remove-token "$CLEANUP_MAX_WAIT_SECONDS" "$CLEANUP_REQUEST_TIMEOUT_SECONDS"; then
    log "warning: the runner stays registered as $runner_name: $failure_message"
    return 0
  fi
  if ./config.sh remove --unattended --token "$token"; then
    log "removed runner $runner_name from $scope_name"
  else
    log "warning: config.sh remove failed with status $?; runner $runner_name stays registered"
  fi
}

on_signal() {
  local code=$1 name=$2
  trap '' INT TERM # one cleanup, however many signals follow
  log "got SIG$name: stopping the runner and removing it from GitHub"
  stop_runner
  # config.sh writes .runner once the runner is registered; without it there is nothing to remove.
  if [[ -f .runner ]]; then
    remove_registration
  fi
  exit "$code"
}

run_registered() {
  [[ -x ./config.sh && -x ./run.sh ]] ||
    die 2 "$PWD is not a runner folder (no executable config.sh and run.sh)"
  read_settings
  load_pat
  runner_pid=""
  trap 'on_signal 130 INT' INT
  trap 'on_signal 143 TERM' TERM

  if [[ -f .runner ]]; then
    # Only a restarted container finds the configuration of its previous run here.
    log "discarding the runner configuration left by a previous start"
    rm -f .runner .credentials .credentials_rsaparams
  fi

  # The name is the pod's hostname, so a registration under it is this pod's own, left by an
  # earlier container: replacing it is safe once it is offline. An online one is another live
  # process under the same hostname (pods with hostNetwork, a copied hostname), never ours to take.
  # (Right after a crash GitHub may still show our own runner online for a while; the kubelet
  # then restarts the container, with a growing backoff, until GitHub shows it offline.)
  local replace=()
  find_registration || die "$failure_code" "$failure_message"
  case $registered_status in
    online)
      die 3 "a runner named $runner_name is online in $scope_name; refusing to replace it (do two pods share this hostname?)"
      ;;
    offline)
      log "replacing the offline registration of $runner_name (this pod's earlier container)"
      replace=(--replace)
      ;;
  esac

  log "registering runner $runner_name with $scope_name (PAT from $pat_source)"
  request_token registration-token "$max_wait" "$REQUEST_TIMEOUT_SECONDS" ||
    die "$failure_code" "$failure_message"

  local args=(--unattended --url "$scope_url" --token "$token" --name "$runner_name"
    --work _work --disableupdate "${replace[@]}")
  if [[ -n $labels ]]; then
    args+=(--labels "$labels")
  fi
  if [[ $ephemeral == true ]]; then
    args+=(--ephemeral)
  fi
  local config_status=0
  ./config.sh "${args[@]}" || config_status=$?
  token=""
  ((config_status == 0)) || die "$config_status" "config.sh failed with status $config_status"

  # Job control gives run.sh its own process group and, unlike a plain background job, leaves
  # SIGINT enabled in it, so the runner can act on the signals this script passes on.
  set -m
  ./run.sh &
  runner_pid=$!
  set +m
  local runner_status=0
  wait "$runner_pid" || runner_status=$?
  runner_pid=""
  log "the runner exited with status $runner_status"
  exit "$runner_status"
}

# --- JIT mode -----------------------------------------------------------------------------------

# Unsets every variable named like a GitHub credential or holding a GitHub token, so that no job
# on a GPU runner can read one from its environment.
scrub_credentials() {
  local name value
  while IFS= read -r name; do
    value=${!name-}
    case $name in
      GITHUB_RUNNER_PAT | GITHUB_PAT_FILE | GITHUB_TOKEN | GH_TOKEN | GH_ENTERPRISE_TOKEN | \
        GITHUB_ENTERPRISE_TOKEN | *_PAT | *_PAT_*)
        unset "$name"
        continue
        ;;
    esac
    case $value in
      ghp_* | github_pat_* | gho_* | ghu_* | ghs_* | ghr_*) unset "$name" ;;
    esac
  done < <(compgen -e)
}

run_jit() {
  [[ -x ./run.sh ]] || die 2 "$PWD is not a runner folder (no executable run.sh)"
  local file=${RUNNER_JITCONFIG_FILE:-} config
  [[ -n $file ]] ||
    die 2 "RUNNER_JITCONFIG_FILE is not set; in jit mode it names the file holding the JIT config"
  [[ -f $file && -r $file ]] || die 2 "RUNNER_JITCONFIG_FILE names $file, which cannot be read"
  config=$(<"$file")
  config=${config//[[:space:]]/}
  [[ -n $config ]] || die 2 "RUNNER_JITCONFIG_FILE names $file, which is empty"
  scrub_credentials
  log "starting the single-use runner from $file"
  # The runner reads any `run` argument from ACTIONS_RUNNER_INPUT_<ARG> and removes the variable
  # from its listener's environment, so job steps do not inherit it. Passed as --jitconfig, the
  # config would sit in /proc/<pid>/cmdline of run.sh and the listener for all to read.
  export ACTIONS_RUNNER_INPUT_JITCONFIG=$config
  # exec: run.sh becomes this process and gets the pod's signals itself.
  exec ./run.sh
}

# --- Broker mode --------------------------------------------------------------------------------

# Sets `jit_config` to the pod's one runner config, asking the broker with the pod's token;
# retried within the retry budget on 5xx, 429 and network errors, fatal on anything else.
request_base_runner_config() {
  local url="$broker_url$BROKER_CONFIG_PATH" try=0 waited=0 delay output body status
  local curl_status message problem token
  while :; do
    try=$((try + 1))
    # Read afresh on every try: the kubelet replaces the token before it expires.
    [[ -f $token_file && -r $token_file ]] ||
      die 2 "GPU_RUNNERS_BROKER_TOKEN_FILE names $token_file, which cannot be read (is the projected token volume mounted?)"
    token=$(<"$token_file")
    token=${token//[[:space:]]/}
    [[ -n $token ]] || die 2 "the token file $token_file is empty"
    curl_status=0
    output=$(printf 'Authorization: Bearer %s\n' "$token" |
      curl --silent --request POST --header @- --header 'Accept: application/json' \
        --user-agent gpu-runners-entrypoint \
        --connect-timeout 10 --max-time "$REQUEST_TIMEOUT_SECONDS" \
        --write-out '\n%{http_code}' "$url") || curl_status=$?
    token=""
    status=${output##*$'\n'}
    body=${output%$'\n'*}

    if ((curl_status != 0)); then
      [[ $RETRYABLE_CURL_CODES == *" $curl_status "* ]] ||
        die 4 "cannot send POST $url (curl exit status $curl_status)"
      problem="no answer from the broker (curl exit status $curl_status)"
    else
      message=$(github_message "$body")
      case $status in
        200)
          jit_config=$(printf '%s' "$body" | jq -r '.encoded_jit_config // empty' 2>/dev/null) ||
            jit_config=""
          [[ -n $jit_config ]] || die 4 "the broker's answer to POST $url holds no runner config"
          return 0
          ;;
        401)
          die 3 "the broker did not accept the token in $token_file (401${message:+: $message}): the pod's projected volume must hold a ServiceAccount token for the broker's base-runner audience"
          ;;
        403)
          die 3 "the broker refused this pod (403${message:+: $message}): only pods of the base runner Deployment, running as ServiceAccount base-runner, get a runner config"
          ;;
        409)
          die 3 "this pod had its one runner config already (409${message:+: $message}); the broker replaces the pod with a fresh one"
          ;;
        429 | 5??)
          problem="the broker answered $status${message:+: $message}"
          ;;
        *)
          die 3 "the broker answered $status to POST $url${message:+: $message}"
          ;;
      esac
    fi

    ((try < MAX_ATTEMPTS)) || die 4 "gave up on POST $url after $try tries: $problem"
    delay=$(backoff_seconds "$try")
    fits_budget "$waited" "$delay" "$max_wait" ||
      die 4 "gave up on POST $url: $problem, and waiting ${delay}s more would exceed the retry budget of ${max_wait}s (RUNNER_API_MAX_WAIT_SECONDS)"
    log "POST $url: $problem; trying again in ${delay}s (try $((try + 1)) of $MAX_ATTEMPTS)"
    pause "$delay"
    waited=$(awk -v a="$waited" -v b="$delay" 'BEGIN { print a + b }')
  done
}

run_broker() {
  [[ -x ./run.sh ]] || die 2 "$PWD is not a runner folder (no executable run.sh)"
  # bash as a container's PID 1 ignores signals it has no trap for.
  trap 'exit 130' INT
  trap 'exit 143' TERM
  read_retry_settings
  broker_url=${GPU_RUNNERS_BROKER_URL:-}
  broker_url=${broker_url%/}
  [[ $broker_url =~ ^https?://[^[:space:]]+$ ]] ||
    die 2 "GPU_RUNNERS_BROKER_URL is '$broker_url'; in broker mode it must be the broker's http(s) URL, e.g. http://gpu-runners-broker.gpu-runners-broker.svc:8080"
  token_file=${GPU_RUNNERS_BROKER_TOKEN_FILE:-$DEFAULT_BROKER_TOKEN_FILE}

  log "asking the broker at $broker_url for this pod's runner config"
  request_base_runner_config
  scrub_credentials
  log "starting the single-use runner the broker registered for this pod"
  # As in jit mode: the runner takes the config from ACTIONS_RUNNER_INPUT_JITCONFIG and drops it
  # from its listener's environment; never on a command line.
  export ACTIONS_RUNNER_INPUT_JITCONFIG=$jit_config
  jit_config=""
  trap - INT TERM
  exec ./run.sh
}

main() {
  case ${RUNNER_MODE:-registration} in
    registration) run_registered ;;
    broker) run_broker ;;
    jit) run_jit ;;
    *) die 2 "RUNNER_MODE is '${RUNNER_MODE}'; allowed: registration, broker, jit" ;;
  esac
}

main "$@"
