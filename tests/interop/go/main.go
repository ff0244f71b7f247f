// Go Kafka clients against a Tributary gateway: franz-go (kgo, kadm) and sarama. Built and run
// by tests/interop/kafka_tools.sh, one check per invocation; a check exits 1 with the first
// difference from what Kafka would answer.
//
//	go-clients BOOTSTRAP CHECK [CODEC]
//	CHECK: franz-produce CODEC | franz-group | kadm | sarama-produce CODEC | sarama-group | sarama-admin
package main

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/IBM/sarama"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

var bootstrap string

func main() {
	bootstrap = os.Args[1]
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Second)
	defer cancel()
	var err error
	switch os.Args[2] {
	case "franz-produce":
		err = franzProduce(ctx, os.Args[3])
	case "franz-group":
		err = franzGroup(ctx)
	case "kadm":
		err = kadmCheck(ctx)
	case "sarama-produce":
		err = saramaProduce(ctx, os.Args[3])
	case "sarama-group":
		err = saramaGroup(ctx)
	case "sarama-admin":
		err = saramaAdmin()
	default:
		err = fmt.Errorf("unknown check %q", os.Args[2])
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", os.Args[2], err)
		os.Exit(1)
	}
	fmt.Println("ok", os.Args[2:])
}

// rec is one record as read back: its key, value and its "seq" header.
type rec struct {
	partition int32
	key, val  string
	seq       int
}

func record(i int) (key, value string) {
	return "key-" + strconv.Itoa(i%37), fmt.Sprintf("value %d %0*d", i, i%50, 0)
}

// newTopic creates a topic with kadm (shared by the checks of both libraries).
func newTopic(ctx context.Context, topic string, partitions int32) error {
	cl, err := kgo.NewClient(kgo.SeedBrokers(bootstrap))
	if err != nil {
		return err
	}
	defer cl.Close()
	resp, err := kadm.NewClient(cl).CreateTopics(ctx, partitions, 1, nil, topic)
	if err != nil {
		return err
	}
	r, err := resp.On(topic, nil)
	if err != nil {
		return err
	}
	return r.Err
}

// readAll reads n records of topic from the start of every partition with kgo (direct, no group).
func readAll(ctx context.Context, topic string, partitions int32, n int) ([]rec, error) {
	offsets := map[int32]kgo.Offset{}
	for p := int32(0); p < partitions; p++ {
		offsets[p] = kgo.NewOffset().AtStart()
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(bootstrap), kgo.ConsumePartitions(map[string]map[int32]kgo.Offset{topic: offsets}),
		kgo.FetchMaxWait(100*time.Millisecond))
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	var out []rec
	for len(out) < n {
		fetches := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			return nil, fmt.Errorf("read %d of %d records: %w", len(out), n, ctx.Err())
		}
		if errs := fetches.Errors(); len(errs) > 0 {
			return nil, fmt.Errorf("fetch: %v", errs)
		}
		fetches.EachRecord(func(r *kgo.Record) {
			seq := -1
			for _, h := range r.Headers {
				if h.Key == "seq" {
					seq, _ = strconv.Atoi(string(h.Value))
				}
			}
			out = append(out, rec{r.Partition, string(r.Key), string(r.Value), seq})
		})
	}
	return out, nil
}

// verify: n records read back, each sent one once (key, value, seq header), all records of a
// key in one partition, and each partition's records in the order they were sent.
func verify(got []rec, n int) error {
	if len(got) != n {
		return fmt.Errorf("read %d records, sent %d", len(got), n)
	}
	seen := map[int]bool{}
	keyPartition := map[string]int32{}
	last := map[int32]int{}
	for _, r := range got {
		if r.seq < 0 || r.seq >= n || seen[r.seq] {
			return fmt.Errorf("record seq %d missing, out of range or twice", r.seq)
		}
		seen[r.seq] = true
		k, v := record(r.seq)
		if r.key != k || r.val != v {
			return fmt.Errorf("record %d: %q=%q, sent %q=%q", r.seq, r.key, r.val, k, v)
		}
		if p, ok := keyPartition[k]; ok && p != r.partition {
			return fmt.Errorf("key %s in partitions %d and %d", k, p, r.partition)
		}
		keyPartition[k] = r.partition
		if prev, ok := last[r.partition]; ok && prev > r.seq {
			return fmt.Errorf("partition %d: seq %d after %d", r.partition, r.seq, prev)
		}
		last[r.partition] = r.seq
	}
	return nil
}

var franzCodecs = map[string]kgo.CompressionCodec{
	"none": kgo.NoCompression(), "gzip": kgo.GzipCompression(), "snappy": kgo.SnappyCompression(),
	"lz4": kgo.Lz4Compression(), "zstd": kgo.ZstdCompression(),
}

// franzProduce: kgo's producer (idempotent by default), acks=all, in one codec.
func franzProduce(ctx context.Context, codec string) error {
	topic := "franz-" + codec
	const n = 500
	if err := newTopic(ctx, topic, 3); err != nil {
		return err
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(bootstrap), kgo.DefaultProduceTopic(topic),
		kgo.RequiredAcks(kgo.AllISRAcks()), kgo.ProducerBatchCompression(franzCodecs[codec]), kgo.ProducerLinger(20*time.Millisecond))
	if err != nil {
		return err
	}
	var records []*kgo.Record
	for i := 0; i < n; i++ {
		k, v := record(i)
		records = append(records, &kgo.Record{Key: []byte(k), Value: []byte(v),
			Headers: []kgo.RecordHeader{{Key: "seq", Value: []byte(strconv.Itoa(i))}}})
	}
	if err := cl.ProduceSync(ctx, records...).FirstErr(); err != nil {
		return fmt.Errorf("produce: %w", err)
	}
	cl.Close()
	got, err := readAll(ctx, topic, 3, n)
	if err != nil {
		return err
	}
	return verify(got, n)
}

// groupLog collects what the members of a group consumed.
type groupLog struct {
	mu    sync.Mutex
	seen  map[string]int // "partition@offset" -> member
	byMem map[int]int
	twice string
}

func (g *groupLog) add(member int, partition int32, offset int64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	id := fmt.Sprintf("%d@%d", partition, offset)
	if _, dup := g.seen[id]; dup && g.twice == "" {
		g.twice = id
	}
	g.seen[id] = member
	g.byMem[member]++
}

func (g *groupLog) count() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.seen)
}

func produceFranz(ctx context.Context, topic string, from, n int) error {
	cl, err := kgo.NewClient(kgo.SeedBrokers(bootstrap), kgo.DefaultProduceTopic(topic))
	if err != nil {
		return err
	}
	defer cl.Close()
	var records []*kgo.Record
	for i := from; i < from+n; i++ {
		k, v := record(i)
		records = append(records, &kgo.Record{Key: []byte(k), Value: []byte(v),
			Headers: []kgo.RecordHeader{{Key: "seq", Value: []byte(strconv.Itoa(i))}}})
	}
	return cl.ProduceSync(ctx, records...).FirstErr()
}

// franzGroup: kgo group members (cooperative-sticky, kgo's default balancer) commit after each
// poll and allow rebalances only between polls; two members read 300 records, a third joins, 300
// more: every record once, and the newcomer gets a share.
func franzGroup(ctx context.Context) error {
	topic, group := "franz-group", "franz-group"
	if err := newTopic(ctx, topic, 6); err != nil {
		return err
	}
	log := &groupLog{seen: map[string]int{}, byMem: map[int]int{}}
	stop, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	start := func(member int) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cl, err := kgo.NewClient(kgo.SeedBrokers(bootstrap), kgo.ConsumerGroup(group), kgo.ConsumeTopics(topic),
				kgo.DisableAutoCommit(), kgo.BlockRebalanceOnPoll(), kgo.FetchMaxWait(100*time.Millisecond),
				kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
			if err != nil {
				errs <- err
				return
			}
			// A rebalance blocked by a poll would keep Close (which leaves the group) waiting.
			defer func() { cl.AllowRebalance(); cl.Close() }()
			for stop.Err() == nil {
				fetches := cl.PollFetches(stop)
				if stop.Err() != nil {
					break
				}
				fetches.EachRecord(func(r *kgo.Record) {
					log.add(member, r.Partition, r.Offset)
				})
				if err := cl.CommitUncommittedOffsets(stop); err != nil && stop.Err() == nil {
					errs <- fmt.Errorf("member %d commit: %w", member, err)
				}
				cl.AllowRebalance()
			}
		}()
	}
	wait := func(n int) error {
		for log.count() < n {
			select {
			case err := <-errs:
				return err
			case <-ctx.Done():
				return fmt.Errorf("consumed %d of %d", log.count(), n)
			case <-time.After(50 * time.Millisecond):
			}
		}
		return nil
	}
	start(0)
	start(1)
	if err := produceFranz(ctx, topic, 0, 300); err != nil {
		return err
	}
	if err := wait(300); err != nil {
		return err
	}
	start(2)
	// The newcomer's share: records produced after it joined (a rebalance may take a moment,
	// so produce in rounds until it has consumed some).
	for round := 0; log.byMemCount(2) == 0; round++ {
		if round == 20 {
			return fmt.Errorf("the third member consumed nothing")
		}
		if err := produceFranz(ctx, topic, 300+round*30, 30); err != nil {
			return err
		}
		if err := wait(300 + (round+1)*30); err != nil {
			return err
		}
	}
	cancel()
	wg.Wait()
	if log.twice != "" {
		return fmt.Errorf("record %s consumed twice", log.twice)
	}
	return nil
}

func (g *groupLog) byMemCount(m int) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.byMem[m]
}

func kadmCheck(ctx context.Context) error {
	cl, err := kgo.NewClient(kgo.SeedBrokers(bootstrap))
	if err != nil {
		return err
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	topic := "kadm-topic"
	retention := "3600000"
	created, err := adm.CreateTopics(ctx, 2, 1, map[string]*string{"retention.ms": &retention}, topic)
	if err != nil {
		return err
	}
	if r, _ := created.On(topic, nil); r.Err != nil {
		return fmt.Errorf("create: %w", r.Err)
	}
	again, err := adm.CreateTopics(ctx, 2, 1, nil, topic)
	if err != nil {
		return err
	}
	if r, _ := again.On(topic, nil); r.Err == nil {
		return fmt.Errorf("a duplicate create succeeded")
	}
	topics, err := adm.ListTopics(ctx)
	if err != nil {
		return err
	}
	if !topics.Has(topic) || len(topics[topic].Partitions) != 2 {
		return fmt.Errorf("ListTopics: %v", topics.Names())
	}
	cfgValue := func() (string, error) {
		rc, err := adm.DescribeTopicConfigs(ctx, topic)
		if err != nil {
			return "", err
		}
		r, err := rc.On(topic, nil)
		if err != nil || r.Err != nil {
			return "", fmt.Errorf("describe configs: %v %v", err, r.Err)
		}
		for _, c := range r.Configs {
			if c.Key == "retention.ms" && c.Value != nil {
				return *c.Value, nil
			}
		}
		return "", fmt.Errorf("no retention.ms in %v", r.Configs)
	}
	if v, err := cfgValue(); err != nil || v != retention {
		return fmt.Errorf("retention.ms %q %v", v, err)
	}
	longer := "7200000"
	altered, err := adm.AlterTopicConfigs(ctx, []kadm.AlterConfig{{Op: kadm.SetConfig, Name: "retention.ms", Value: &longer}}, topic)
	if err != nil {
		return err
	}
	if r, _ := altered.On(topic, nil); r.Err != nil {
		return fmt.Errorf("alter: %w", r.Err)
	}
	if v, err := cfgValue(); err != nil || v != longer {
		return fmt.Errorf("retention.ms after the alter %q %v", v, err)
	}
	grown, err := adm.UpdatePartitions(ctx, 3, topic)
	if err != nil {
		return err
	}
	if r, _ := grown.On(topic, nil); r.Err != nil {
		return fmt.Errorf("partitions: %w", r.Err)
	}
	if err := produceFranz(ctx, topic, 0, 40); err != nil {
		return err
	}
	ends, err := adm.ListEndOffsets(ctx, topic)
	if err != nil {
		return err
	}
	total := int64(0)
	for p := int32(0); p < 3; p++ {
		o, ok := ends.Lookup(topic, p)
		if !ok || o.Err != nil {
			return fmt.Errorf("end offset of %d: %v", p, o.Err)
		}
		total += o.Offset
	}
	if total != 40 {
		return fmt.Errorf("end offsets add up to %d, not 40", total)
	}
	var offsets kadm.Offsets
	offsets.AddOffset(topic, 0, 5, -1)
	committed, err := adm.CommitOffsets(ctx, "kadm-group", offsets)
	if err != nil || committed.Error() != nil {
		return fmt.Errorf("commit: %v %v", err, committed.Error())
	}
	fetched, err := adm.FetchOffsets(ctx, "kadm-group")
	if err != nil {
		return err
	}
	if o, ok := fetched.Lookup(topic, 0); !ok || o.At != 5 {
		return fmt.Errorf("fetched offset %v", o)
	}
	groups, err := adm.ListGroups(ctx)
	if err != nil {
		return err
	}
	if _, ok := groups["kadm-group"]; !ok {
		return fmt.Errorf("ListGroups: %v", groups.Groups())
	}
	deleted, err := adm.DeleteGroups(ctx, "kadm-group")
	if err != nil || deleted.Error() != nil {
		return fmt.Errorf("delete group: %v %v", err, deleted.Error())
	}
	dt, err := adm.DeleteTopics(ctx, topic)
	if err != nil || dt.Error() != nil {
		return fmt.Errorf("delete topic: %v %v", err, dt.Error())
	}
	return nil
}

var saramaCodecs = map[string]sarama.CompressionCodec{
	"none": sarama.CompressionNone, "gzip": sarama.CompressionGZIP, "snappy": sarama.CompressionSnappy,
	"lz4": sarama.CompressionLZ4, "zstd": sarama.CompressionZSTD,
}

func saramaConfig() *sarama.Config {
	cfg := sarama.NewConfig()
	cfg.Version = sarama.V3_6_0_0
	cfg.ClientID = "tributary-interop"
	return cfg
}

// saramaProduce: sarama's idempotent sync producer (acks=all, one request in flight).
func saramaProduce(ctx context.Context, codec string) error {
	topic := "sarama-" + codec
	const n = 500
	if err := newTopic(ctx, topic, 3); err != nil {
		return err
	}
	cfg := saramaConfig()
	cfg.Producer.Idempotent = true
	cfg.Producer.RequiredAcks = sarama.WaitForAll
	cfg.Producer.Return.Successes = true
	cfg.Producer.Compression = saramaCodecs[codec]
	cfg.Producer.Flush.Frequency = 20 * time.Millisecond
	cfg.Net.MaxOpenRequests = 1
	p, err := sarama.NewSyncProducer([]string{bootstrap}, cfg)
	if err != nil {
		return err
	}
	var msgs []*sarama.ProducerMessage
	for i := 0; i < n; i++ {
		k, v := record(i)
		msgs = append(msgs, &sarama.ProducerMessage{Topic: topic, Key: sarama.StringEncoder(k), Value: sarama.StringEncoder(v),
			Headers: []sarama.RecordHeader{{Key: []byte("seq"), Value: []byte(strconv.Itoa(i))}}})
	}
	if err := p.SendMessages(msgs); err != nil {
		return fmt.Errorf("produce: %w", err)
	}
	if err := p.Close(); err != nil {
		return err
	}
	got, err := readAll(ctx, topic, 3, n)
	if err != nil {
		return err
	}
	return verify(got, n)
}

type saramaHandler struct {
	member int
	log    *groupLog
	ready  chan struct{}
	once   sync.Once
}

func (h *saramaHandler) Setup(s sarama.ConsumerGroupSession) error {
	if len(s.Claims()) > 0 {
		h.once.Do(func() { close(h.ready) })
	}
	return nil
}
func (h *saramaHandler) Cleanup(sarama.ConsumerGroupSession) error { return nil }
func (h *saramaHandler) ConsumeClaim(s sarama.ConsumerGroupSession, c sarama.ConsumerGroupClaim) error {
	for m := range c.Messages() {
		h.log.add(h.member, m.Partition, m.Offset)
		s.MarkMessage(m, "")
		s.Commit()
	}
	return nil
}

// saramaGroup: two sarama members (range balance strategy) share a 4-partition topic; once both
// hold partitions, 400 records: every one consumed once, by both members between them, and the
// commits are the partitions' ends.
func saramaGroup(ctx context.Context) error {
	topic, group := "sarama-group", "sarama-group"
	if err := newTopic(ctx, topic, 4); err != nil {
		return err
	}
	cfg := saramaConfig()
	cfg.Consumer.Offsets.Initial = sarama.OffsetOldest
	cfg.Consumer.Offsets.AutoCommit.Enable = false
	cfg.Consumer.Group.Rebalance.GroupStrategies = []sarama.BalanceStrategy{sarama.NewBalanceStrategyRange()}
	cfg.Consumer.MaxWaitTime = 100 * time.Millisecond
	log := &groupLog{seen: map[string]int{}, byMem: map[int]int{}}
	stop, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var handlers []*saramaHandler
	for m := 0; m < 2; m++ {
		g, err := sarama.NewConsumerGroup([]string{bootstrap}, group, cfg)
		if err != nil {
			cancel()
			return err
		}
		h := &saramaHandler{member: m, log: log, ready: make(chan struct{})}
		handlers = append(handlers, h)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer g.Close()
			for stop.Err() == nil {
				if err := g.Consume(stop, []string{topic}, h); err != nil && stop.Err() == nil {
					fmt.Fprintln(os.Stderr, "consume:", err)
					time.Sleep(100 * time.Millisecond)
				}
			}
		}()
	}
	for _, h := range handlers {
		select {
		case <-h.ready:
		case <-ctx.Done():
			cancel()
			return fmt.Errorf("a member got no partitions")
		}
	}
	if err := produceFranz(ctx, topic, 0, 400); err != nil {
		cancel()
		return err
	}
	for log.count() < 400 && ctx.Err() == nil {
		time.Sleep(50 * time.Millisecond)
	}
	cancel()
	wg.Wait()
	if log.count() != 400 || log.twice != "" {
		return fmt.Errorf("consumed %d of 400, twice: %q", log.count(), log.twice)
	}
	if log.byMem[0] == 0 || log.byMem[1] == 0 {
		return fmt.Errorf("one member consumed everything: %v", log.byMem)
	}
	adm, err := sarama.NewClusterAdmin([]string{bootstrap}, saramaConfig())
	if err != nil {
		return err
	}
	defer adm.Close()
	resp, err := adm.ListConsumerGroupOffsets(group, map[string][]int32{topic: {0, 1, 2, 3}})
	if err != nil {
		return err
	}
	sum := int64(0)
	for p := int32(0); p < 4; p++ {
		b := resp.GetBlock(topic, p)
		if b == nil || b.Err != sarama.ErrNoError {
			return fmt.Errorf("committed offset of %d: %v", p, b)
		}
		sum += b.Offset
	}
	if sum != 400 {
		return fmt.Errorf("committed offsets add up to %d, not 400", sum)
	}
	return nil
}

// saramaAdmin: sarama's ClusterAdmin everyday calls.
func saramaAdmin() error {
	adm, err := sarama.NewClusterAdmin([]string{bootstrap}, saramaConfig())
	if err != nil {
		return err
	}
	defer adm.Close()
	topic := "sarama-admin"
	retention := "3600000"
	if err := adm.CreateTopic(topic, &sarama.TopicDetail{NumPartitions: 2, ReplicationFactor: 1,
		ConfigEntries: map[string]*string{"retention.ms": &retention}}, false); err != nil {
		return fmt.Errorf("create: %w", err)
	}
	if err := adm.CreateTopic(topic, &sarama.TopicDetail{NumPartitions: 2, ReplicationFactor: 1}, false); err == nil {
		return fmt.Errorf("a duplicate create succeeded")
	}
	topics, err := adm.ListTopics()
	if err != nil {
		return err
	}
	if d, ok := topics[topic]; !ok || d.NumPartitions != 2 {
		return fmt.Errorf("ListTopics: %v", topics[topic])
	}
	brokers, _, err := adm.DescribeCluster()
	if err != nil || len(brokers) != 1 {
		return fmt.Errorf("DescribeCluster: %v %v", brokers, err)
	}
	value := func() (string, error) {
		entries, err := adm.DescribeConfig(sarama.ConfigResource{Type: sarama.TopicResource, Name: topic})
		if err != nil {
			return "", err
		}
		for _, e := range entries {
			if e.Name == "retention.ms" {
				return e.Value, nil
			}
		}
		return "", fmt.Errorf("no retention.ms")
	}
	if v, err := value(); err != nil || v != retention {
		return fmt.Errorf("retention.ms %q %v", v, err)
	}
	longer := "7200000"
	if err := adm.IncrementalAlterConfig(sarama.TopicResource, topic, map[string]sarama.IncrementalAlterConfigsEntry{
		"retention.ms": {Operation: sarama.IncrementalAlterConfigsOperationSet, Value: &longer}}, false); err != nil {
		return fmt.Errorf("incremental alter: %w", err)
	}
	if v, err := value(); err != nil || v != longer {
		return fmt.Errorf("retention.ms after the alter %q %v", v, err)
	}
	if err := adm.CreatePartitions(topic, 3, nil, false); err != nil {
		return fmt.Errorf("partitions: %w", err)
	}
	md, err := adm.DescribeTopics([]string{topic})
	if err != nil || len(md) != 1 || len(md[0].Partitions) != 3 {
		return fmt.Errorf("DescribeTopics: %v", err)
	}
	// A group's offset, committed with sarama's offset manager, listed and deleted by the admin.
	client, err := sarama.NewClient([]string{bootstrap}, saramaConfig())
	if err != nil {
		return err
	}
	om, err := sarama.NewOffsetManagerFromClient("sarama-admin-group", client)
	if err != nil {
		return err
	}
	pom, err := om.ManagePartition(topic, 0)
	if err != nil {
		return err
	}
	pom.MarkOffset(7, "")
	om.Commit()
	_ = pom.Close()
	_ = om.Close()
	_ = client.Close()
	groups, err := adm.ListConsumerGroups()
	if err != nil {
		return err
	}
	if _, ok := groups["sarama-admin-group"]; !ok {
		names := []string{}
		for g := range groups {
			names = append(names, g)
		}
		sort.Strings(names)
		return fmt.Errorf("ListConsumerGroups: %v", names)
	}
	off, err := adm.ListConsumerGroupOffsets("sarama-admin-group", map[string][]int32{topic: {0}})
	if err != nil {
		return err
	}
	if b := off.GetBlock(topic, 0); b == nil || b.Offset != 7 {
		return fmt.Errorf("committed offset %v", b)
	}
	if err := adm.DeleteConsumerGroup("sarama-admin-group"); err != nil {
		return fmt.Errorf("delete group: %w", err)
	}
	if err := adm.DeleteTopic(topic); err != nil {
		return fmt.Errorf("delete topic: %w", err)
	}
	return nil
}
