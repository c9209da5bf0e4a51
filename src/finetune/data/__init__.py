"""The data side: where raw rows come from, how they are formatted, and the quickstart's generated set."""
