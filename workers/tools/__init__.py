"""Tooling outside the serving path: the loader benchmark and the demo/test model builders."""
