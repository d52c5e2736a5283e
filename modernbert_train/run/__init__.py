"""A run folder and what is made from it: the folder's files and lock (folder), reports and plots, export to a
Hugging Face folder, the demo that runs the whole job, and launcher command lines (launch)."""
