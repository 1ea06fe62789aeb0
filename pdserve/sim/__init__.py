"""Discrete-event simulation of a pdserve fleet, driving the same policy objects as the router."""
