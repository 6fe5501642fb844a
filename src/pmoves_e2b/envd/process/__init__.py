"""process.Process: start, stream, signal and feed processes (one module per concern)."""
