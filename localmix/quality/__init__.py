"""What a quant costs: a model against a reference over the same text, as llama-perplexity
--kl-divergence measures it (stats: the numbers; evaluate: the chunked run; quants: the table)."""
