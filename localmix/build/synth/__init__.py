"""Synthetic models, built offline in seconds: checkpoints.py writes seeded random-weight
checkpoints (converted like real ones), ggufs.py writes GGUFs directly for an architecture localmix
runs but does not convert, and builtin.py turns them into the store's tiny-mistral / tiny-mixtral."""
