"""Plumbing every layer shares: user-facing errors, progress and console output, the deletion guard."""
