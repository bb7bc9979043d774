"""The single-module subcommands (convert, inspect, init, check, demo): `add_arguments(parser)` and `run(args)`.

Jobs with modules of their own are packages beside this one: score, generate, compress, train."""
