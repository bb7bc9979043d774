"""One module per `hpc-llama` subcommand: `add_arguments(parser)` and `run(args)`."""
