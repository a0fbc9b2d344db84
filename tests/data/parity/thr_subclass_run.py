import threading
class Worker(threading.Thread):
    def __init__(self, n):
        super().__init__()
        self.n, self.out = n, None
    def run(self):
        self.out = self.n ** 2
ws = [Worker(i) for i in range(5)]
for w in ws:
    w.start()
for w in ws:
    w.join()
print([w.out for w in ws])
