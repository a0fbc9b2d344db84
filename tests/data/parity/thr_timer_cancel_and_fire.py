import threading
out = []
never = threading.Timer(5, out.append, args=("never",))
never.start()
never.cancel()
later = threading.Timer(0.05, lambda: print("fired", out))
later.start()
print("main done")
