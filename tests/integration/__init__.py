"""Tests that run the pieces together: training runs, sweeps, several processes, parity with
other libraries, the bucket emulator, the reliability drills."""
