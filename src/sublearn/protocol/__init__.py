"""The paper's evaluation protocol as data: the questions and the candidate list
(`questions`, with the dev/test halves), the teacher's system prompts (`paper`), the
fine-tuned teachers' statements (`traits`), the words the filter bans (`trait_words`) and the
misalignment prompts and pairs (`misalignment`). Pure Python, no torch."""
