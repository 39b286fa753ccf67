"""The `vitune` command line: subcommands for data, jobs, the demo, submission and export."""
