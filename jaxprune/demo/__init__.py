"""The demo: LeNets, data sets, recipes, the run and its checkpoints, and the ``jaxprune`` command.

It sits on top of the library; nothing in the core imports it.
"""
