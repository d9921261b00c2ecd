"""callrouter: an inbound SIP call router for a voice-AI platform."""

__version__ = "0.1.0"
