"""What serves people: model loading, generation, hot-swap and the chat UI.

Never imports the trainers in `online_rl`.
"""
