"""The command line (`python -m dreambooth_core`, `dreambooth`): argument parsing (`main`), what each
subcommand does (`commands`), the terminal as a job's host (`console`) and the demo."""
