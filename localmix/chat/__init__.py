"""Conversation logic without a terminal: exact chat prompts (template), which format a GGUF speaks
(detection), reasoning models' thinking (reasoning) and the session (session).

Import from the submodules: `from localmix.chat.template import encode, Message`,
`from localmix.chat.session import Session, Notice`.
"""
