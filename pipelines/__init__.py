"""Runnable beamcap jobs."""
