"""Continual unlearning: one deletion request turns theta_{k-1} into theta_k."""
