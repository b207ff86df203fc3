"""Intake: is a model folder complete, well-formed, and compatible with the stream's base?"""
