"""Jobs, schedules and sensors: how feeds stay fresh without anyone clicking."""
