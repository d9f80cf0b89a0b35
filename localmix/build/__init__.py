"""Making GGUF files: convert (a checkpoint, streamed one tensor at a time), quantize, importance
matrices (imatrix/) and the synthetic models the demo and the tests build (synth/)."""
