"""What learns: datasets from feedback, reward model, PPO, KTO, the retrain
cycle, the evaluation gate, the scheduler and simulated users.

Never imports gradio.
"""
