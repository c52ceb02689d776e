def add(a, b):
    return a + b


def is_even(n):
<CURSOR>


def greet(name):
    message = "Hello, " + name
    return message
