"""Where models come from and where they live: the catalog (models.toml), the Hub, a repository's
files, the store (manifests, staged writes, locks) and `pull`, which joins them. Nothing here
knows about llama.cpp."""
