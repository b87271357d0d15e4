"""Helpers shared by the test modules.

A test module imports helpers only from here, never from another test module.
"""
