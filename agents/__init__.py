"""Agents on Ray actors: the coordinator, agent actors and their tools, the message bus, shared
state, and durable workflows (pure scheduling in `scheduling`, the run loop in `engine`)."""
