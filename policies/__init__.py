"""Planning policies: pure functions and data classes, no sockets, clocks or files."""
