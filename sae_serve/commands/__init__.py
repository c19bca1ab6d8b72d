"""One module per ``sae-serve`` subcommand, imported only when that subcommand runs."""
