def main():
    print("moed")
