"""The crew on top: agents and tasks (config/*.yaml), their tools, the Flow that runs the rounds, the manager.

It calls down into the workspace and the stages (reddit, preprocessing, training, aggregation, evaluation);
nothing below imports it.
"""
