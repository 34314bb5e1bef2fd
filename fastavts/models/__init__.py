"""Networks: video towers (video.py), the audio tower (audio.py), the AVTS model (avts.py)."""
