"""The command-line edge: parse, call one library function, render."""
