"""Scores of reconstructions and predictions: the NSD metrics, BrainCLIP tasks, run-level evaluate."""
