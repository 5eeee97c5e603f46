"""Sans-I/O learning protocols: plain state machines, events in, effects out."""
