"""Crash matrix for Shimmy rings: real processes, real daemon, SIGKILL at random points."""
