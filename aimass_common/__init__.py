"""Helpers every package shares: files written whole or not at all, settings, the CLI's failure line.

A leaf: it imports nothing from the project, so any package may import it without a cycle.
"""
