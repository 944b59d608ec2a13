"""Typed application keys."""

from aiohttp import web

from simulator.builds import Builds
from simulator.state import SimState

STATE = web.AppKey("simulator_state", SimState)
BUILDS = web.AppKey("simulator_builds", Builds)
