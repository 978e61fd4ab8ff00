"""Runtime layer: graph capture and cache, dynamic ops, step buffers."""
