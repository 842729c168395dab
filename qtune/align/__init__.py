"""Alignment: preference and PPO losses, reward models, reward functions."""
