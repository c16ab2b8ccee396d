"""Fakes that ship beside the interfaces they fake (CONVENTIONS.md example 7)."""
