"""Data domains a teacher generates in (numbers today; code and CoT math later)."""
