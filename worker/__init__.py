"""The worker process: owns its sessions' Chromium browsers and drives WhatsApp Web in them."""
