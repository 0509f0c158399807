"""Developer and CI commands of the project (run as `python -m scripts.<name>`)."""
