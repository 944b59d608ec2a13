"""Typed application keys."""

from aiohttp import web

from simulator.state import SimState

STATE = web.AppKey("simulator_state", SimState)
