"""Helpers shared by the tests: a fake clock, real CPU runtimes, fakes behind the runtime's interfaces."""
