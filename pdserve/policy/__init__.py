"""Pure decision code shared by the live processes and the simulator: no I/O, no clock reads."""
