import threading
count = 0
lock = threading.Lock()
def add():
    global count
    for _ in range(1000):
        with lock:
            count += 1
ts = [threading.Thread(target=add) for _ in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
print(count)
