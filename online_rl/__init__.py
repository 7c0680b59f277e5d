"""What learns: datasets from feedback, reward model, PPO, KTO, the retrain
cycle, the evaluation gate, the scheduler and simulated users.

Never imports gradio.
"""

# Ways a retrain cycle can update the policy (`online_rl.cycle`); the first is the default.
# tilt: reward models, then the policy's own replies re-weighted by them (`online_rl.tilt`);
# ppo: reward models, then PPO (`online_rl.ppo`); kto: straight from the thumbs (`online_rl.kto`).
# Why tilt is the default: docs/learning.md.
METHODS = ("tilt", "ppo", "kto")
