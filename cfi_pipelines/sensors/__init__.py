"""Sensors: view lag, validated campaigns, alerts."""
